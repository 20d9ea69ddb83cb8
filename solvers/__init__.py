"""Pure algorithms over numbers for autopar: the intra-op sharding ILP, exact chain
composition, the inter-op stage DP and operator clustering. numpy / networkx / pulp only."""
