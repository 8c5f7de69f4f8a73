"""Published results reproduced: Szegedy et al.'s Table 1, C&W's Table IV, DeepFool's rho_adv."""
