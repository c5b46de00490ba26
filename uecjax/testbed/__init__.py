"""The compiled research testbed: whole RL runs as one jitted program, vmapped over seeds.

`loop.CompiledLoop` is the loop (sampling, jnp reward, advantages, exploration and the
library's train step inside one jit); `countdown_reward` is the countdown task's accuracy in
jnp on token ids, equal to the host grader `uecjax.data.countdown.countdown_accuracy`.
"""
