"""mtprl.distributed: process groups, FSDP2 / DTensor tensor parallel applied from outside the model,
trainer -> rollout weight sync, Ray workers. Not built yet (single-process training today); the config
rejects multi-process settings with that reason."""
