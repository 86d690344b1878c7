"""What each published list achieved: realized model performance and campaign uplift against the control group."""  # noqa: E501
