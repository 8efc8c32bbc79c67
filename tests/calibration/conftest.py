def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a real model (SmolLM2-135M); deselect with -m 'not slow'")
