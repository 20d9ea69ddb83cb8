"""Pure algorithms over numbers for autopar: the intra-op sharding ILP, the
inter-op stage DP and operator clustering. numpy / networkx / pulp only."""
