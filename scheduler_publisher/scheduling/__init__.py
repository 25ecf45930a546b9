"""APScheduler 3 as the entries' clock: one job per entry (scheduler.py), run inline on the
network thread (executor.py), filed by run time (jobstore.py), on shared triggers spread
over phase slots (triggers.py, plan.py, spread.py). Never imports mqtt/.
"""
