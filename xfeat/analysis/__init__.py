"""``analyze``: what is wrong with a dataset, before a model is blamed for it.

One feature cache and the images behind it are examined by seven diagnoses, one module each,
every one returning a :class:`~xfeat.analysis.section.Section`:

1. ``balance``: class fractions per split, the majority-class baseline, the prior shift;
2. ``shift``: train/test covariate shift, a domain classifier's out-of-fold AUC (0.5 = none);
3. ``duplicates``: exact duplicates (hashes of decoded pixels), near duplicates (cosine
   similarity of embeddings) and patient ids present in more than one split;
4. ``label_noise``: out-of-fold probabilities on train, confident-learning rule;
5. ``gaps``: train/val/test gaps of a logistic probe and of any given runs;
6. ``calibration``: calibration of the probe and the effect of the val-chosen threshold;
7. ``adaptation``: the probe's val-test gap after each *transductive* site adaptation of
   :mod:`xfeat.heads.adaptation` (standardize, coral, em), and whether EM's test prior is plausible.

``core.analyze`` reads the inputs (``inputs``), fits or reuses the probe (``probe``), runs
the sections and then writes ``analysis.json``, ``analysis.md``, the PNG figures (``plots``)
and CSV lists of flagged images. Every probe is :class:`~xfeat.heads.LogisticHead`
(standardised features, L2, balanced class weights), so the numbers mean the same as
``fit_head``'s.
"""

from xfeat.analysis.core import Analysis, analyze

__all__ = ["Analysis", "analyze"]
