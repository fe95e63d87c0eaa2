"""The simulator (`voicectl simulate`): the control plane's pure policy replayed on traces in
virtual time. It imports provisioner's policy code; nothing in the product imports it."""
