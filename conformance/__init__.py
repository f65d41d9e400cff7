"""Protocol specification, test vectors and a black-box homeserver checker."""
