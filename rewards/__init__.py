"""Built-in reward plugins, registered through the entry-point group `longalign_rl.rewards`
(see setup.cfg), the same path a third-party plugin takes. Never imports ray or deepspeed."""
