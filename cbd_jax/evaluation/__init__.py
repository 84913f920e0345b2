"""How good a model is: held-out perplexity and bits per byte, count baselines, lm-eval."""
