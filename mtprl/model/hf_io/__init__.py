"""mtprl.model.hf_io."""
