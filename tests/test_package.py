import lightning_sdm


def test_public_names_resolve_and_match_all():
    for name in lightning_sdm.__all__:
        assert getattr(lightning_sdm, name).__name__ == name
    assert set(lightning_sdm.__all__) <= set(dir(lightning_sdm))


def test_unknown_attribute_raises_attribute_error():
    try:
        lightning_sdm.does_not_exist  # noqa: B018
    except AttributeError as error:
        assert "does_not_exist" in str(error)
    else:
        raise AssertionError("expected AttributeError")
