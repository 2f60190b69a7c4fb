"""What predictions are worth: metrics, operating thresholds, bootstrap intervals, DeLong's test.

``core`` validates inputs and holds the weighted metric code that point estimates and
bootstrap resamples share; ``metrics`` computes and tabulates every metric a run reports and
chooses thresholds on val; ``stats`` gives their uncertainty (percentile bootstrap, paired
bootstrap, DeLong). numpy, scipy and scikit-learn only: no torch.
"""
