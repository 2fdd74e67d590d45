"""``python -m studies.llm --out docs`` (``--help`` for the options)."""

from studies.llm.main import main

main()
