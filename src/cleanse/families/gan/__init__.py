"""The GAN family (issue 17): data cleansing for GANs by the influence of each training instance on an evaluation metric."""
