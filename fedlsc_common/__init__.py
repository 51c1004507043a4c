"""What both Flower apps and the tooling share: settings from ``conf/``, the label set,
and atomic, checked files (model files, checkpoints). No Flower strategy code here."""
