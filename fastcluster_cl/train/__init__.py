"""The trainer behind ``fastcluster-cl train``: config, runtime, loop (the Trainer), evaluate,
rundir, checkpoint, optim, schedule, logging, progress, presets, plots. Needs the ``[train]``
extra (torchvision, scikit-learn, scipy, matplotlib, tqdm, tensorboard); the losses do not."""
