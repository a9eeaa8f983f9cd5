"""Opt-in checks against a real OpenAI-compatible model (see test_real_llm.py and docs/llm.md)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "realmodel: needs a real model endpoint (PPSEHR_REAL_LLM_BASE_URL, "
                                       "PPSEHR_REAL_LLM_MODEL); skipped without them")
