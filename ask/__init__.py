"""ask: adversarial soft kNN attacks and defences on deep features (Wang et al., IEEE Access 2022)."""

__version__ = "0.1.0"


def wrap(module, **settings):  # noqa: ANN001, ANN201 - typed in ask.models.wrapped
    """Any classifier ``nn.Module`` as ask's model: [0, 1] pixels in, hidden layers named by module path.

    See :func:`ask.models.wrapped.wrap` for the settings (``layers``, ``mean``, ``std``,
    ``image_size``, ``in_channels``, ``num_classes``). Imported on call, so ``import ask`` stays
    free of torch.
    """
    from ask.models.wrapped import wrap as _wrap

    return _wrap(module, **settings)
