"""Where the ranks are and how they find each other: hostfiles (thunderlink's and
MLX's formats, JACCL device matrices), the network interfaces of this host,
and the rendezvous from configuration to a connected communicator. The
transports themselves (tcp, shm, rdma) are in the C core."""
