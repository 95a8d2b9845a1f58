//! What a learned word may be called. A word's name is also the stem of the files it is
//! written to (A1111 and ComfyUI name a word after its file), so a name is a name and never
//! a path: a shared workflow whose token is `../checkpoints/victim` must not write there.

/// Longest name accepted, in bytes: file names are limited to 255 bytes, and the name
/// gets a step and an extension (`-1000000.safetensors`).
pub const MAX_NAME_BYTES: usize = 128;

/// Characters that separate paths, drives or streams somewhere (`/`, `\`, `:`), or that
/// Windows refuses in file names (`*`, `?`, `"`, `|`). `<` and `>` stay allowed: diffusers'
/// placeholder tokens are written `<cat-toy>`.
const FORBIDDEN: &[char] = &['/', '\\', ':', '*', '?', '"', '|'];

/// Device names Windows reserves whatever the extension (`con.pt` opens the console).
const WINDOWS_RESERVED: &[&str] = &[
    "con", "prn", "aux", "nul", "com0", "com1", "com2", "com3", "com4", "com5", "com6", "com7",
    "com8", "com9", "com¹", "com²", "com³", "lpt0", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6",
    "lpt7", "lpt8", "lpt9", "lpt¹", "lpt²", "lpt³", "conin$", "conout$",
];

/// Checks that `name` can name a learned word and the files it is written to; the error
/// says why not.
pub fn check_word_name(name: &str) -> Result<(), String> {
    let shown = name.escape_debug();
    let refuse = |why: &str| Err(format!("'{shown}' cannot name a word: {why}"));
    if name.trim().is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse(&format!(
            "it is {} bytes long; at most {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return refuse(&format!("it contains the control character {:?}", c));
    }
    if name.chars().any(char::is_whitespace) {
        return refuse("it contains whitespace; a word is one token of a prompt");
    }
    if let Some(c) = name.chars().find(|c| FORBIDDEN.contains(c)) {
        return refuse(&format!(
            "it contains '{c}'; a name is a file name, not a path (no / \\ : * ? \" |)"
        ));
    }
    if name.starts_with('.') {
        return refuse("it starts with '.' (hidden files, '.' and '..' are not names)");
    }
    if name.ends_with('.') {
        return refuse("it ends with '.', which Windows drops from file names");
    }
    let device = name.split('.').next().unwrap_or(name).to_lowercase();
    if WINDOWS_RESERVED.contains(&device.as_str()) {
        return refuse(&format!(
            "'{device}' is a device name on Windows, whatever the extension"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_names_not_paths() {
        for ok in [
            "my-cat",
            "<cat-toy>",
            "a1111_style",
            "ÿ-word",
            "word.v2",
            "x",
        ] {
            assert!(check_word_name(ok).is_ok(), "{ok}");
        }
        let long = "w".repeat(MAX_NAME_BYTES + 1);
        for (bad, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("../checkpoints/victim", "'/'"),
            ("..", "starts with '.'"),
            (".hidden", "starts with '.'"),
            ("/etc/passwd", "'/'"),
            ("..\\evil", "'\\'"),
            ("C:evil", "':'"),
            ("two words", "whitespace"),
            ("tab\tword", "control"),
            ("nul\0byte", "control"),
            ("CON", "device name"),
            ("com1.backup", "device name"),
            ("Lpt9", "device name"),
            ("dot.", "ends with '.'"),
            ("star*", "'*'"),
            (long.as_str(), "bytes long"),
        ] {
            let e = check_word_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
