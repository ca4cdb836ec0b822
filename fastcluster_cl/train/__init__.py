"""The trainer behind ``fastcluster-cl train`` (trainer, checkpoint, optim, schedule, logging,
plots). Needs the ``[train]`` extra (torchvision, scikit-learn, scipy, matplotlib, tqdm,
tensorboard); the losses do not."""
