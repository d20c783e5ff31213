import warnings

import pytest

# mmengine imports pkg_resources, which setuptools < 81 deprecates on every import
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


def _memoize_external_config_lookup():
    """mmengine resolves each ``mmdet::_base_/...`` base by parsing every metafile of mmdet (~0.7 s) before
    falling back to the base path; the configs here name ~10 such bases. Remember the answers per process."""
    from mmengine.config import utils

    original, memo = utils._get_cfg_metainfo, {}

    def lookup(package_path, cfg_path):
        key = (package_path, cfg_path)
        if key not in memo:
            try:
                memo[key] = (original(package_path, cfg_path), None)
            except ValueError as e:
                memo[key] = (None, e)
        found, error = memo[key]
        if error is not None:
            raise error
        return found

    utils._get_cfg_metainfo = lookup


_memoize_external_config_lookup()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
