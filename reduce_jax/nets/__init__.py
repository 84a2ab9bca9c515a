"""The networks run on the array: Flax models with BatchNorm folding (`models`), convolutions
that batch over a population of chips (`conv`), and the CIFAR augmentation (`augment`)."""
