"""Supervision of dynos: one task per dyno, Heroku's rules as pure decisions, records, the kernel
side of a dyno, the convergence engine and the state-change bus.
"""
