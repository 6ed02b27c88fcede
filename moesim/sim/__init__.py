"""The discrete-event simulator: topology, flow-level network, collectives, compute model,
step programs and the step simulation. Consumes planner/ traffic; imports nothing above it."""
