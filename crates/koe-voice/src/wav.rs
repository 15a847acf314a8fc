//! WAV files in and out: any PCM or float WAV is read, mixed to mono and resampled to 48 kHz
//! (rubato); recordings are written as 16-bit mono. A file that is not a usable WAV is a
//! clear error, never a panic.

use std::path::Path;

use rubato::{FftFixedInOut, Resampler};

use crate::codec::SAMPLE_RATE;

#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("{path}: not a usable WAV file: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("{path}: cannot write: {reason}")]
    Write { path: String, reason: String },
    #[error("cannot resample from {from} Hz to {to} Hz: {reason}")]
    Resample { from: u32, to: u32, reason: String },
}

/// Longest file read (an hour at 48 kHz), so a lying header cannot exhaust memory.
const MAX_SAMPLES: usize = 48_000 * 3600;

/// Reads a WAV file as mono samples at 48 kHz in −1.0..1.0.
pub fn read_mono_48k(path: &Path) -> Result<Vec<f32>, WavError> {
    let (samples, rate) = read_mono(path)?;
    resample(&samples, rate, SAMPLE_RATE)
}

/// Reads a WAV file as mono samples at its own rate.
pub fn read_mono(path: &Path) -> Result<(Vec<f32>, u32), WavError> {
    let shown = path.display().to_string();
    let unreadable = |reason: String| WavError::Unreadable { path: shown.clone(), reason };
    let reader = hound::WavReader::open(path).map_err(|e| unreadable(e.to_string()))?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate < 4_000 || spec.sample_rate > 384_000 {
        return Err(WavError::Unsupported {
            path: shown.clone(),
            reason: format!("{} channel(s) at {} Hz is not audio Koe can play", spec.channels, spec.sample_rate),
        });
    }
    if reader.len() as usize > MAX_SAMPLES * usize::from(spec.channels) {
        return Err(WavError::Unsupported { path: shown.clone(), reason: "longer than an hour".into() });
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| unreadable(e.to_string()))?,
        hound::SampleFormat::Int if (1..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| unreadable(e.to_string()))?
        }
        format => {
            return Err(WavError::Unsupported {
                path: shown.clone(),
                reason: format!("{format:?} samples of {} bits are not supported", spec.bits_per_sample),
            })
        }
    };
    let channels = usize::from(spec.channels);
    let mono = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

/// Writes mono samples as a 16-bit WAV file.
pub fn write_mono(path: &Path, samples: &[f32], rate: u32) -> Result<(), WavError> {
    let write_error = |e: hound::Error| WavError::Write { path: path.display().to_string(), reason: e.to_string() };
    let spec = hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut writer = hound::WavWriter::create(path, spec).map_err(write_error)?;
    for &sample in samples {
        let value = (sample.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
        writer.write_sample(value).map_err(write_error)?;
    }
    writer.finalize().map_err(write_error)
}

/// Resamples a whole signal; the output is aligned with the input (the filter delay is
/// removed) and has `len × to / from` samples.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, WavError> {
    if from == to {
        return Ok(samples.to_vec());
    }
    let error = |reason: String| WavError::Resample { from, to, reason };
    let mut resampler =
        FftFixedInOut::<f32>::new(from as usize, to as usize, 1024, 1).map_err(|e| error(e.to_string()))?;
    let delay = resampler.output_delay();
    let wanted = (samples.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let mut out = Vec::with_capacity(wanted + delay + 2048);
    let mut position = 0;
    let mut chunk = Vec::new();
    while out.len() < wanted + delay {
        let needed = resampler.input_frames_next();
        chunk.clear();
        let end = (position + needed).min(samples.len());
        chunk.extend_from_slice(&samples[position.min(end)..end]);
        chunk.resize(needed, 0.0);
        position += needed;
        let produced = resampler.process(&[&chunk], None).map_err(|e| error(e.to_string()))?;
        out.extend_from_slice(&produced[0]);
    }
    Ok(out[delay..delay + wanted].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("koe-wav-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_stereo_44k_file_comes_back_as_48k_mono_of_the_same_length() -> Result<(), WavError> {
        let path = temp("stereo.wav");
        let spec = hound::WavSpec { channels: 2, sample_rate: 44_100, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut writer = hound::WavWriter::create(&path, spec).map_err(|e| WavError::Write { path: "t".into(), reason: e.to_string() })?;
        for i in 0..44_100 {
            let v = ((i as f32 * 2.0 * std::f32::consts::PI * 440.0 / 44_100.0).sin() * 10_000.0) as i16;
            for _ in 0..2 {
                writer.write_sample(v).map_err(|e| WavError::Write { path: "t".into(), reason: e.to_string() })?;
            }
        }
        writer.finalize().map_err(|e| WavError::Write { path: "t".into(), reason: e.to_string() })?;
        let samples = read_mono_48k(&path)?;
        let _ = std::fs::remove_file(&path);
        assert_eq!(samples.len(), 48_000);
        let rms = (samples[1000..47_000].iter().map(|s| s * s).sum::<f32>() / 46_000.0).sqrt();
        assert!((rms - 10_000.0 / 32_768.0 / 2f32.sqrt()).abs() < 0.01, "rms {rms}");
        Ok(())
    }

    #[test]
    fn corrupt_and_foreign_files_are_clear_errors() {
        let path = temp("corrupt.wav");
        for (bytes, expected) in [
            (&b"RIFF\x10\x00\x00\x00WAVEfmt "[..], "not a usable WAV file"),
            (&b"ID3\x03this is an mp3"[..], "not a usable WAV file"),
            (&[][..], "not a usable WAV file"),
        ] {
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
            let error = read_mono_48k(&path).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(expected) && error.contains("corrupt.wav"), "{error}");
        }
        let _ = std::fs::remove_file(&path);
        let missing = read_mono_48k(Path::new("/nonexistent/x.wav")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("/nonexistent/x.wav"), "{missing}");
    }
}
