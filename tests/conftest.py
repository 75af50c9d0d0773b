import pytest

from checkpoints import build


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model); each built once per session."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = (folder, build(name, folder))
        return made[name]

    return get
