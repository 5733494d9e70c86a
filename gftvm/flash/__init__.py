"""FLASH (Li, Mandal, Ogras, Marculescu, CODES+ISSS'21) on gftvm's toolchain: a DenseNet-type
search space (space), NN-Degree (degree), a few-sample accuracy predictor (predictor), hardware
models fitted to gftvm-compiled modules (hardware, measure), hierarchical SHGO (search), and
the gradient-filter plan under a train-step budget (filter_search). See docs/flash.md."""
