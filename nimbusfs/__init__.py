"""nimbusfs command line and the embedded single-machine deployment."""
