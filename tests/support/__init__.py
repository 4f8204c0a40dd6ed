"""What the tests share: backends' derivative transforms, the float64
references, and small attention blocks."""
