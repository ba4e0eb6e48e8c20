"""Hugging Face Space-style entry point: the same app as `python -m workbench.ui`."""

from workbench.ui.__main__ import main

if __name__ == "__main__":
    main()
