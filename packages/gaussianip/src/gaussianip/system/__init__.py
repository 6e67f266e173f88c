"""The three stages of GaussianIP wired together (:mod:`gaussianip.system.pipeline`)."""
