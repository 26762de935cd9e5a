"""Running attacks against victims and turning the outcome into metrics."""
