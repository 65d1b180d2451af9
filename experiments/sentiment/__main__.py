"""`python -m experiments.sentiment --workdir runs/sentiment`: the controlled-sentiment study."""

from experiments.sentiment.pipeline import main

main()
