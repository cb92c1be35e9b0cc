"""The hospital's worker: the Flower ClientApp that reads the site's images, trains (DP-SGD) and
replies with an update, validation figures or contest scores."""
