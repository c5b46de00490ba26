"""The compiled research testbed: whole RL runs as one jitted, seed-vmapped program."""
