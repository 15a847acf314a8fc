//! The computer's microphone and speaker, through cpal (the `audio-device` feature): a call
//! without `--play` takes its microphone from the default input device, and plays what it
//! hears on the default output device. Both run at 48 kHz (mono, or stereo mixed down and
//! duplicated) and meet the media driver in two [`SoundQueue`]s that hold at most three
//! frames, so a device that runs a little fast or slow costs a dropped or silent sample, never
//! a growing delay.
//!
//! cpal's streams are not `Send` on every platform, so they live on a thread of their own
//! until the [`SoundDevices`] is dropped.

use std::sync::mpsc;
use std::thread::JoinHandle;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use koe_media::driver::{pull_sound, push_sound, SoundQueue};
use koe_voice::SAMPLE_RATE;

/// The open sound devices of one call. Closed when dropped.
#[derive(Debug)]
pub struct SoundDevices {
    pub microphone: SoundQueue,
    pub speaker: SoundQueue,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SoundDevices {
    /// Opens the default input and output devices; the error says which one failed and why.
    pub fn open() -> Result<Self, String> {
        let (microphone, speaker): (SoundQueue, SoundQueue) = Default::default();
        let (opened_tx, opened) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let queues = (microphone.clone(), speaker.clone());
        let thread = std::thread::Builder::new()
            .name("koe-sound".into())
            .spawn(move || match start_streams(queues.0, queues.1) {
                Ok(streams) => {
                    let _ = opened_tx.send(Ok(()));
                    let _ = stopped.recv();
                    drop(streams);
                }
                Err(error) => {
                    let _ = opened_tx.send(Err(error));
                }
            })
            .map_err(|e| format!("cannot start the sound thread: {e}"))?;
        opened.recv().map_err(|_| "the sound thread ended early".to_string())??;
        Ok(Self { microphone, speaker, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for SoundDevices {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Builds a stream with the first 48 kHz configuration the device accepts: mono if it can,
/// else stereo (mixed down, duplicated). `build` gets the configuration's channel count.
fn first_accepted<E: std::fmt::Display>(
    what: &str,
    mut build: impl FnMut(&cpal::StreamConfig, usize) -> Result<cpal::Stream, E>,
) -> Result<cpal::Stream, String> {
    let mut last_error = String::new();
    for channels in [1, 2] {
        let config = cpal::StreamConfig { channels, sample_rate: cpal::SampleRate(SAMPLE_RATE), buffer_size: cpal::BufferSize::Default };
        match build(&config, usize::from(channels)) {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error.to_string(),
        }
    }
    Err(format!("the {what} does not work at 48 kHz: {last_error}"))
}

fn start_streams(microphone: SoundQueue, speaker: SoundQueue) -> Result<(cpal::Stream, cpal::Stream), String> {
    let host = cpal::default_host();
    let input = host.default_input_device().ok_or("no microphone (no default input device)")?;
    let output = host.default_output_device().ok_or("no speaker (no default output device)")?;
    let report = |what: &'static str| move |error: cpal::StreamError| tracing::warn!(%error, "the {what} failed");
    let capture = first_accepted("microphone", |config, channels| {
        let (queue, mut mono) = (microphone.clone(), Vec::new());
        let callback = move |data: &[f32], _: &cpal::InputCallbackInfo| {
            mono.clear();
            mono.extend(data.chunks(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32));
            push_sound(&queue, &mono);
        };
        input.build_input_stream(config, callback, report("microphone"), None)
    })?;
    let playback = first_accepted("speaker", |config, channels| {
        let (queue, mut mono) = (speaker.clone(), Vec::new());
        let callback = move |data: &mut [f32], _: &cpal::OutputCallbackInfo| {
            mono.resize(data.len() / channels, 0.0);
            pull_sound(&queue, &mut mono);
            for (frame, sample) in data.chunks_mut(channels).zip(&mono) {
                frame.fill(*sample);
            }
        };
        output.build_output_stream(config, callback, report("speaker"), None)
    })?;
    capture.play().map_err(|e| format!("the microphone does not start: {e}"))?;
    playback.play().map_err(|e| format!("the speaker does not start: {e}"))?;
    Ok((capture, playback))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real cpal streams on ALSA's null device (no sound card needed): the speaker's queue is
    /// drained at the device's pace and the microphone's is filled.
    #[test]
    fn the_devices_move_sound_at_their_own_pace() -> Result<(), String> {
        let home = std::env::temp_dir().join(format!("koe-sound-test-{}", std::process::id()));
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        std::fs::write(home.join(".asoundrc"), "pcm.!default { type null }\nctl.!default { type hw card 0 }\n").map_err(|e| e.to_string())?;
        // ALSA reads ~/.asoundrc when it is first used, which is below.
        std::env::set_var("HOME", &home);
        let devices = SoundDevices::open()?;
        push_sound(&devices.speaker, &[0.1; 3 * 960]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let left = devices.speaker.lock().map(|q| q.len()).unwrap_or(usize::MAX);
        let captured = devices.microphone.lock().map(|q| q.len()).unwrap_or(0);
        drop(devices);
        let _ = std::fs::remove_dir_all(&home);
        assert_eq!(left, 0, "the speaker played what it was given");
        assert!(captured > 0, "the microphone delivered samples");
        Ok(())
    }
}
