//! A writer of the `newc` cpio format the kernel unpacks as its initramfs (uncompressed: the
//! kernel accepts it as is, and it saves compressing ~100 MB on every run).

use std::io::{self, Write};

/// Streams entries into a cpio archive; [`Cpio::finish`] writes the trailer.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Self { out, ino: 1, written: 0 }
    }

    /// A directory (parents must come first).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, 0o040_755, b"")
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100_000 | (mode & 0o7777), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120_777, target.as_bytes())
    }

    /// Writes the trailer and returns the writer and the archive's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry("TRAILER!!!", 0, b"")?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let size = u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{path}: over 4 GiB")))?;
        let name_len = u32::try_from(name.len() + 1).map_err(|_| io::Error::other("name too long"))?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name_len, 0];
        self.ino += 1;
        let header: String =
            std::iter::once("070701".to_owned()).chain(fields.iter().map(|f| format!("{f:08x}"))).collect();
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::Cpio;

    #[test]
    fn entries_are_aligned_and_the_trailer_ends_the_archive() {
        let mut c = Cpio::new(Vec::new());
        c.dir("/bin").unwrap();
        c.file("/bin/x", 0o755, b"hello").unwrap();
        c.symlink("/bin/y", "x").unwrap();
        let (out, size) = c.finish().unwrap();
        assert_eq!(out.len() as u64, size);
        assert_eq!(size % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file entry's header: mode 0100755 and size 5.
        let at = text.find("bin/x\0").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000005");
    }
}
