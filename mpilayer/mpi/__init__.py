"""The MPI run: messages, the master's engine and the workers."""
