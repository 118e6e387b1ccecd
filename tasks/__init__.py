"""Training, evaluation, prediction and benchmarks (``import visionattn.tasks``)."""
