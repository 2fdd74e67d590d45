"""``python -m studies.reproduction --out docs --jobs 2`` (``--help`` for the options)."""

from studies.reproduction.main import main

main()
