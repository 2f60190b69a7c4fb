"""``predict``: a saved head or fine-tuned network on new image files, with the checks a
prediction on images from the wild needs.

``run`` reads the images (brought to the training geometry first, by default), runs the
backbone and the head, and scores how far each image lies from the training data;
``rows`` turns that into one row per image (probabilities, decision, threshold and rule,
geometry, input check, out-of-distribution score, error) and the summary warnings.
"""

from xfeat.prediction.run import expand_images, predict

__all__ = ["expand_images", "predict"]
