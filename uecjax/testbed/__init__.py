"""The countdown testbed: on-device pieces for RL on the embedded countdown task
(`uecjax.data.countdown`), e.g. its reward on token ids (`countdown_reward`)."""
