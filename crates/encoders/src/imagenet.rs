//! The 1000 ImageNet-1k class names, in the order of torchvision's classifiers.

const CLASSES: &str = include_str!("imagenet_classes.txt");

/// Name of ImageNet class `index`, if it exists.
pub fn class_name(index: usize) -> Option<&'static str> {
    CLASSES.lines().nth(index)
}

/// All class names.
pub fn class_names() -> Vec<&'static str> {
    CLASSES.lines().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousand_classes() {
        assert_eq!(super::class_names().len(), 1000);
        assert_eq!(super::class_name(281), Some("tabby"));
        assert_eq!(super::class_name(1000), None);
    }
}
