"""The machine and the plan: hardware probe, placement plan, speed prediction. No torch needed."""
