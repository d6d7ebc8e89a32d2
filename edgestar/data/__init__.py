"""Images in, model inputs out: folders, arrays, the demo set, preprocessing, distilled inputs."""
