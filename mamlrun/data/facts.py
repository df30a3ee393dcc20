"""What the paper's datasets hold, known before any file is read: classes per split, images per
class and image sizes (Finn et al. 2017, Appendix A.1). Validation uses them to refuse impossible
task shapes before training starts; the loaders use them to check what they read."""

# Omniglot: 1623 characters (964 in images_background, 659 in images_evaluation), split as the
# authors' code splits them: 1200 for meta-training, 100 of which are kept for validation, and 423
# for testing. miniImageNet: Ravi & Larochelle's 64 / 16 / 20 classes.
SPLIT_CLASSES = {
    "omniglot": {"train": 1100, "validation": 100, "test": 423},
    "miniimagenet": {"train": 64, "validation": 16, "test": 20},
}
IMAGES_PER_CLASS = {"omniglot": 20, "miniimagenet": 600}
IMAGE_SIZES = {"omniglot": 28, "miniimagenet": 84}
