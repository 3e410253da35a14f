"""occkd_core: the method of "Teacher-Student Training and Triplet Loss to Reduce the Effect of Drastic
Face Occlusion" (Georgescu, Ionescu et al.) as a library: data, occlusion, models, losses, mining,
one training loop, evaluation, fusion and statistics. It imports neither Ray nor MLflow."""

__version__ = "0.1.0"
