"""Hospital side: the Flower ClientApp that trains on local images and replies with weights."""
