"""Running the coordinator's machine: provisioning, the SuperLink and its processes, the nginx
front, and the gates that admit only approved apps and registered node keys."""
