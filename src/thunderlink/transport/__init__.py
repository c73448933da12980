"""Python side of the transports: hostfiles, rendezvous, interfaces."""
